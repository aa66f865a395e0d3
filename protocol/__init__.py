"""Wire models, the typed HTTP client and zeroconf helpers shared by every side.
Built in a later issue; imports pydantic, requests and zeroconf only.
"""
