"""Wire protocol version: bumped when a message changes in a way old peers cannot read."""

PROTOCOL_VERSION = 1
