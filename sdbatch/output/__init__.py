"""What a run leaves on disk: PNGs that carry their recipe (png), their names (names), the manifest
and the lock (manifest), contact sheets (sheets), and A1111's infotext grammar (a1111).

Torch-free. Import the submodules directly; this package imports nothing so that `recipe` can use
the infotext grammar without pulling Pillow's drawing code or the manifest in.
"""
