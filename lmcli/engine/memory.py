"""Host memory in transparent huge pages.

Reading 270 MB of weights per token through 4 KiB pages spends much of the time on TLB misses: measured here,
the 120 projection matrices of SmolLM2 in bfloat16 take 34 ms per one-token pass in ordinary pages and 17 ms in
2 MiB pages. Linux gives huge pages to memory marked with madvise(MADV_HUGEPAGE) before it is first touched (the
machine's default is often "madvise"), so weights are packed into one such buffer, and the KV cache is marked
before use. In the whole engine the gain did not show beyond noise (docs/benchmarks.md); it is kept because it
costs nothing at run time and the micro-benchmark gain is real."""

import ctypes
import sys

import torch

HUGE_PAGE = 2 << 20
PAGE = 4096
MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23  # Linux 5.14 and later


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Mark a CPU tensor's memory for huge pages; True if the kernel accepted. Only pages not yet touched change."""
    if t.device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    start = (start + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE  # whole huge pages inside the tensor
    if end - start < HUGE_PAGE:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


def populate(t: torch.Tensor) -> None:
    """Fault in a contiguous CPU tensor's pages, its contents unchanged: the first write to an anonymous page costs
    a fault and a zeroed page (0.4 GB/s on a Firecracker VM here, the host backing the page too), paid here
    instead of inside a kernel. madvise(MADV_POPULATE_WRITE) where the kernel has it, else each page's first byte
    written back: then nothing may write the memory meanwhile."""
    flat = t.view(-1).view(torch.uint8)
    if flat.numel() == 0:
        return
    if sys.platform.startswith("linux"):
        start = flat.data_ptr() // PAGE * PAGE
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(flat.data_ptr() + flat.numel() - start),
                            MADV_POPULATE_WRITE) == 0:
                return
        except (OSError, AttributeError):
            pass
    pages = flat[(-flat.data_ptr()) % PAGE::PAGE]  # a byte at each page start inside
    pages.copy_(pages.clone())
    flat[:1].copy_(flat[:1].clone())  # and the page the tensor starts in


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """An untouched uint8 CPU buffer of nbytes, starting on a huge-page boundary, marked for huge pages."""
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    offset = (-raw.data_ptr()) % HUGE_PAGE
    buf = raw[offset:offset + nbytes]
    advise_huge_pages(buf)
    return buf


def pack_parameters(module: torch.nn.Module) -> None:
    """Move every CPU parameter of module into one huge-page buffer (each aligned to 64 bytes)."""
    params = [p for p in module.parameters() if p.device.type == "cpu"]
    sizes = [-(-p.numel() * p.element_size() // 64) * 64 for p in params]
    buf = huge_page_buffer(sum(sizes))
    offset = 0
    for p, size in zip(params, sizes):
        nbytes = p.numel() * p.element_size()
        view = buf[offset:offset + nbytes].view(p.dtype).view(p.shape)
        view.copy_(p.data)
        p.data = view
        offset += size
