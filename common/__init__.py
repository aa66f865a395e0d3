"""Pieces every Tessera package shares: the exception hierarchy and typed settings.

Nothing here may import Blender, Qt or the network stack; every other package imports
this one, so it must stay small and dependency-free (settings need pydantic, which
`renderers/` never imports: it only uses `common.errors`).
"""
