"""The names of the database's index kinds, storages and metrics, without faiss: the command
line offers them as choices on an install that has no faiss yet (one without the cpu or gpu extra)."""

INDEX_KINDS = ("flat", "ivf-flat", "ivf-pq", "hnsw", "ivf-rabitq")
STORAGES = ("fp32", "fp16", "sq8")
METRICS = ("cosine", "ip")
