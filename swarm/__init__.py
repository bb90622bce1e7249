"""vswarm: variant-parallel inference on a peer-to-peer swarm of edge devices.

Every device runs one light variant of a MobileNetV2 family; any device can ask the others
to classify an input; each answers its signed top-k; the requester combines the replies
with a vote that holds when some peers are faulty or lying.
"""

PROTOCOL_VERSION = 2

__all__ = ["PROTOCOL_VERSION"]
