"""The HTTP coordinator: accounts, jobs, scheduling with leases, verification, assembly,
credits and storage. Built in a later issue; it may import `renderers` (tiling and EXR
only) and `protocol`, never Qt.
"""
