"""One kernel session: its state, its kernel process, its queues and its client."""
