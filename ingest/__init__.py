"""Ingestion: sources -> elements -> chunks -> vectors -> Milvus (+ image bytes in the blob store).

unstructured, which parses the documents, reports usage over the network unless told not to: a request when it is
imported (after running ``nvidia-smi``) and one per partitioned file, with the file's type and element counts. A
knowledge-base tool sends nothing about its documents anywhere, so this package opts out before unstructured is
first imported, in this process and in the parse workers (which inherit the environment), the way unstructured
documents it: ``DO_NOT_TRACK=1``. A value the user set is left as it is.
"""

import os

os.environ.setdefault("DO_NOT_TRACK", "1")
