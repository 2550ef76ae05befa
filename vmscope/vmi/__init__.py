"""VM introspection: physical memory -> page-table walk -> virtual address
space -> OS layer (Linux). Each layer takes the one below as an argument."""

from vmscope.vmi.address_space import AddressSpace
from vmscope.vmi.errors import PhysicalMemoryError, TranslationError, VmiError
from vmscope.vmi.memory import BytesMemory, PhysicalMemory, Region, RegionMemory
from vmscope.vmi.paging import Aarch64Paging, Page, Translation, TranslationCache, X86_64Paging

__all__ = [
    "AddressSpace", "Aarch64Paging", "BytesMemory", "Page", "PhysicalMemory", "PhysicalMemoryError",
    "Region", "RegionMemory", "Translation", "TranslationCache", "TranslationError", "VmiError", "X86_64Paging",
]
