"""The local multi-process simulator, fault injection and benchmarks of the swarm.

It runs real ``python -m swarm.peer`` processes (real mDNS, real HTTP), each in a network
namespace of its own when run as root. Attack code lives here, never in ``swarm/``.
"""
