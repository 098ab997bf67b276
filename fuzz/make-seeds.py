#!/usr/bin/env python3
"""Writes the hand-made seeds of fuzz/corpus: --net specs and MACs, and the smallest kernels the
loader takes (a 64-bit ELF with one PT_LOAD, a bzImage header). The net_queues and mmio_transport
seeds are inputs found by fuzzing runs (their format is `arbitrary`'s), kept as they were."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    path = os.path.join(HERE, "corpus", target, "seed-" + name)
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


specs = [
    "macvtap=mvt0", "link=lower0", "link=lower0,mode=vepa,mac=52:54:00:00:00:09",
    "link=eth1,mode=passthru,queues=4", "tap=tap0,queues=2", "fd=3", "fd=3,mac=02:00:00:00:00:01",
    "macvtap=mvt0,mac=52:54:00:12:34:56,queues=16", "52:54:00:12:34:56", "link=lower0,mode=private",
]
for i, s in enumerate(specs):
    write("net_spec", str(i), s)


def elf(entry=0x1000000, paddr=0x1000000, filesz=0x40, memsz=0x1000):
    ehdr = struct.pack("<4sBBBBB7xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0,
                       2, 0x3E, 1, entry, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 7, 0x1000, paddr, paddr, filesz, memsz, 0x1000)
    image = bytearray(ehdr + phdr)
    image += b"\0" * (0x1000 - len(image))
    image += b"\x90" * filesz
    return bytes(image)


def bzimage(setup_sects=4, version=0x20F, xloadflags=1, pref=0x1000000, init_size=0x2000000):
    image = bytearray(512 * (setup_sects + 1) + 0x1000)
    image[0x1F1] = setup_sects
    struct.pack_into("<H", image, 0x1FE, 0xAA55)
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, version)
    image[0x211] = 1  # loadflags: LOADED_HIGH
    struct.pack_into("<I", image, 0x214, 0x100000)  # code32_start
    struct.pack_into("<I", image, 0x22C, 0x7FFFFFFF)  # initrd_addr_max
    struct.pack_into("<I", image, 0x230, 0x200000)  # kernel_alignment
    image[0x234] = 1  # relocatable
    struct.pack_into("<H", image, 0x236, xloadflags)
    struct.pack_into("<I", image, 0x238, 2047)  # cmdline_size
    struct.pack_into("<Q", image, 0x258, pref)
    struct.pack_into("<I", image, 0x260, init_size)
    return bytes(image)


write("kernel_loader", "elf", elf())
write("kernel_loader", "elf-high", elf(entry=0xFFFFFFFF81000000, paddr=0x3FFFF000, memsz=0x10000))
write("kernel_loader", "bzimage", bzimage())
write("kernel_loader", "bzimage-32bit", bzimage(xloadflags=0))
write("kernel_loader", "bzimage-overflow", bzimage(pref=0xFFFFFFFFFFFFF000))
