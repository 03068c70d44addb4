"""Evaluation: eval sets -> runs (RAG and a no-retrieval baseline) -> metrics -> reports."""
