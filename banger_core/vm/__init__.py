"""VMs: the state machine and what it drives.

- ``service``: ``VMService``, every VM operation (create, start, stop, kill, restart,
  delete, prune, set, show, list, reconcile) with its locking and state transitions;
- ``params``: the validated parameters of ``vm.create`` and ``vm.set`` and the checks
  on a spec;
- ``stages``: ``Lifecycle``, the plugin stages around one boot (prepare_host →
  configure_machine → boot → post_boot; cleanup in reverse, with its reason);
- ``handles``: the transient per-VM handles (pids, sockets), mirrored to disk;
- ``disks``: per-VM copy-on-write root disks.
"""
