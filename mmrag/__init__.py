"""mmrag: grounded multimodal generation over a Milvus knowledge base.

The package holds what the stages share (records, settings, errors, model resolution, encoders, the Milvus index,
the blob store) and the entry points (CLI, later the HTTP API). Importing it loads no model and changes no global
state.
"""

__version__ = "0.1.0"
