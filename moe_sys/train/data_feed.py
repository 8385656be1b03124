def build_feeds(cfg, rank, world): raise RuntimeError("pending")
