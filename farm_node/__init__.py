"""The provider daemon: hardware probe, coordinator client loop, bundle cache and render
runner (through `renderers`). Built in a later issue; never imports Qt.
"""
