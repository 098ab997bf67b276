/* tapir-mark: writes one byte to an I/O port, by default 0x54 ('T') to port 0x402.
 * The guest image's init calls it once userspace is up, so a VMM can time its boot by that write:
 * Tapir watches the port itself; QEMU sees it with `-device isa-debugcon,iobase=0x402,chardev=...`. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/io.h>

int main(int argc, char **argv)
{
    unsigned long port = argc > 1 ? strtoul(argv[1], NULL, 0) : 0x402;
    unsigned long value = argc > 2 ? strtoul(argv[2], NULL, 0) : 0x54;

    if (port > 0xffff || value > 0xff) {
        fprintf(stderr, "usage: tapir-mark [PORT [BYTE]]\n");
        return 2;
    }
    if (ioperm(port, 1, 1) != 0) {
        perror("tapir-mark: ioperm");
        return 1;
    }
    outb((unsigned char)value, (unsigned short)port);
    return 0;
}
