"""Edit memory: embedders, the FAISS edit index and the SQL edit log (`memedit.stores`)."""
