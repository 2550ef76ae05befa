"""Page-table walkers: x86_64 (4/5-level) and AArch64 stage 1."""

from vmscope.vmi.paging.aarch64 import Aarch64Paging, stage1_address
from vmscope.vmi.paging.base import Page, Translation, TranslationCache, Walker
from vmscope.vmi.paging.x86_64 import X86_64Paging

__all__ = ["Aarch64Paging", "Page", "Translation", "TranslationCache", "Walker", "X86_64Paging", "stage1_address"]
