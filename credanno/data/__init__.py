"""LIDC nodule selection and patch sources (phantom | lidc | folder)."""

from credanno.data.patchfile import PatchSet, read_patch_file, write_patch_file
from credanno.data.prepare import PrepareResult, prepare

__all__ = ["PatchSet", "PrepareResult", "prepare", "read_patch_file", "write_patch_file"]
