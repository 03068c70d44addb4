"""Retrieval: a prompt (text and/or image) -> grounding examples (passages and reference images) with scores."""
