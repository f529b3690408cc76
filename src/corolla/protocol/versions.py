"""Wire protocol version: bumped when a message changes in a way old peers cannot read."""

PROTOCOL_VERSION = 3  # 3: namespaced handle names, authorised pushes (2026-12-04); 2: backward, deep prompts, adapters
