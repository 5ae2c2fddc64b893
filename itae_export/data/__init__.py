"""The data path under every command: sources (folders, path lists, WebDataset tars), the
embedding stage, the store of vectors and the output set. Clustering (``cluster/``) and the
engines (``engines/``) sit on it; nothing here imports them."""
