"""LIDC nodule selection and patch sources (phantom | lidc | folder)."""

from credanno.data.patchfile import PatchSet, read_patch_file, write_patch_file

__all__ = ["PatchSet", "read_patch_file", "write_patch_file"]
