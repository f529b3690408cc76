"""Wire protocol version: bumped when a message changes in a way old peers cannot read."""

PROTOCOL_VERSION = 2  # 2: backward passes, deep prompts, adapters (2026-11-26)
