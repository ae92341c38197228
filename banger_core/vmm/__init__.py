"""VMM drivers behind one interface: QEMU and Firecracker."""
