"""Imported first by the parse workers (see ``ingest.isolation.PRELOAD``): keeps torch out of them.

spaCy's thinc imports torch whenever it is installed, and that import was 2.2 of the 5.2 CPU seconds it took to load
the parsers in a worker, on the cores the ingest needs to embed. No parser uses torch (PDF text comes through
pdfminer, strategy "fast"), and thinc treats a torch that fails to import as absent, as it does where torch is not
installed. Anything else that imports torch in a worker gets an ImportError, which the worker reports as the file's
failure.
"""

import sys

if "torch" not in sys.modules:  # a worker of a process that already holds torch (spawn never does) keeps it
    sys.modules["torch"] = None  # type: ignore[assignment]
