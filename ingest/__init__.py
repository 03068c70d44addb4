"""Ingestion: sources -> elements -> chunks -> vectors -> Milvus (+ image bytes in the blob store)."""
