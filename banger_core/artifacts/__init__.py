"""Guest artifacts banger builds on the host: kernels, initrds, root filesystems."""
