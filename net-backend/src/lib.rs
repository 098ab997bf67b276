//! The host side of Tapir's NIC: macvtap (found by name or created through rtnetlink), plain tap and
//! ready file descriptors, the vnet header size and offloads, and frame I/O on guest iovecs.
