"""Wire protocol version: bumped when a message changes in a way old peers cannot read."""

# 4: signed answers (receipts, certificates; 2026-12-07); 3: namespaced handle names, authorised pushes (2026-12-04);
# 2: backward, deep prompts, adapters
PROTOCOL_VERSION = 4
