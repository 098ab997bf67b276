#!/usr/bin/python3
"""A hostile vhost-user frontend: connects to the socket in argv[1] again and again, each time
sending one kind of nonsense, and prints `case NAME: ...` per case; then checks that an honest
request still gets its answer. Used by vmm/tests/cli.rs against `tapir vhost-user-net`."""

import array
import os
import socket
import struct
import sys

SOCK = sys.argv[1]
VERSION = 0x1
REPLY = 0x4
GET_FEATURES, SET_OWNER, SET_FEATURES, SET_MEM_TABLE = 1, 3, 2, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE, SET_VRING_KICK = 8, 9, 10, 11, 12
SET_VRING_CALL, GET_CONFIG = 13, 24


def conn():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(SOCK)
    return s


def msg(request, payload=b"", flags=VERSION, size=None):
    return struct.pack("<III", request, flags, len(payload) if size is None else size) + payload


def closed_or_refused(s):
    """What the daemon did after the nonsense: closed the connection, or kept it."""
    try:
        data = s.recv(64)
        return "closed" if not data else f"answered {len(data)} bytes"
    except socket.timeout:
        return "kept"
    except ConnectionResetError:
        return "closed"


def features(s):
    s.sendall(msg(GET_FEATURES))
    hdr = s.recv(12)
    request, flags, size = struct.unpack("<III", hdr)
    value = struct.unpack("<Q", s.recv(size))[0]
    assert request == GET_FEATURES and flags & REPLY, (request, flags)
    return value


def case(name, payloads, fds=None, wait=True):
    s = conn()
    try:
        for i, p in enumerate(payloads):
            if fds is not None and i == 0:
                s.sendmsg([p], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            else:
                s.sendall(p)
        s.settimeout(1)
        print(f"case {name}: {closed_or_refused(s) if wait else 'sent'}", flush=True)
    except (BrokenPipeError, ConnectionResetError):
        print(f"case {name}: closed", flush=True)
    finally:
        s.close()


region = struct.pack("<QQQQ", 0, 1 << 20, 0x7f0000000000, 0)
memfd = os.memfd_create("hostile", 0)  # not sealed: may be shrunk under the daemon
os.ftruncate(memfd, 1 << 20)

case("garbage", [os.urandom(4096)])
case("half a header", [b"\x01\x00\x00"])
case("a size of 4 GiB", [msg(SET_FEATURES, size=0xFFFFFFFF)])
case("a size past the largest message", [msg(SET_FEATURES, b"\0" * 8, size=0x1001)])
case("an unknown request", [msg(9999), msg(0xFFFFFFFF)])
case("a reply sent as a request", [msg(GET_FEATURES, flags=VERSION | REPLY)])
case("a wrong version", [msg(GET_FEATURES, flags=0x3)])
case("a mem table without its fds", [msg(SET_OWNER), msg(SET_MEM_TABLE, struct.pack("<II", 1, 0) + region)])
case("a mem table of 1000 regions", [msg(SET_OWNER), msg(SET_MEM_TABLE, struct.pack("<II", 1000, 0) + region * 8)])
case("a shrinkable memfd", [msg(SET_MEM_TABLE, struct.pack("<II", 1, 0) + region)], fds=[memfd])
case("rings that do not exist", [msg(SET_VRING_NUM, struct.pack("<II", 1000, 256)),
                                 msg(GET_VRING_BASE, struct.pack("<II", 0xFFFFFFFF, 0)),
                                 msg(SET_VRING_KICK, struct.pack("<Q", 77))])
case("a ring address before any memory", [msg(SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, 1, 2, 3, 0))])
case("a ring started without a kick fd", [msg(SET_VRING_KICK, struct.pack("<Q", 0))])
case("a config read of 4 GiB", [msg(GET_CONFIG, struct.pack("<III", 0, 0xFFFFFFFF, 0))])
case("features never offered", [msg(SET_FEATURES, struct.pack("<Q", 1 << 63))])
case("a hundred refused requests", [msg(SET_VRING_NUM, struct.pack("<II", 1000, 256))] * 100)
s = conn()
print(f"honest: features {features(s):#x}", flush=True)
s.close()
