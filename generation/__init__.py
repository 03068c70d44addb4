"""Generation: grounding + prompt -> cited text; references + prompt -> reference-guided images."""
