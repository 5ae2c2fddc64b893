"""itae-search: retrieval with relevance feedback over the embeddings itae-cluster wrote."""
