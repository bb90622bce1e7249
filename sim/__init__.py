"""The local multi-process simulator, fault injection and benchmarks of the swarm.

It runs real ``python -m swarm.peer`` processes (real mDNS, real HTTP), each in a network
namespace of its own when run as root. Attack code lives here, never in ``swarm/``.

- ``python -m sim.run SCENARIO``: a scenario (``sim.scenario``; runners in
  ``sim.runners``) on a ``sim.procs.Cluster`` of peers, sim agents (``sim.agent``:
  slowness and ``sim.byzantine`` attacks) and a driver (``sim.driver``: the requester);
  writes ``report.json``, ``report.md`` and plots (``sim.report``).
- ``python -m sim.faults ACTION``: kill, pause, resume, slow, make Byzantine, partition
  or heal a running sim by hand.
"""
