"""Tenancy under a random interleaving: the harness behind tests/test_tenancy.py and benchmarks/tenancy.py.

Several tenants, each with its own API key, share one API and one knowledge base (milvus-lite). A seeded random
schedule interleaves, across tenants: uploads of text documents and images, searches by text and by image (some
with another tenant's image as the query, some with filters naming another tenant's ids), generations, document
lists, document gets, image fetches and deletes, including gets, fetches and deletes aimed at another tenant's
ids. Every text a tenant uploads carries the tenant's marker (``TENANTMARK<i>``) and a per-document marker; the
tenants write about the same topics, so a missing tenant filter would surface the others' passages at once.

Checks, on every response (``TenancyRun.leaks`` and ``TenancyRun.problems``):
- a leak: the body (as text) holds another tenant's marker, document id, chunk id, or name; an image fetch
  returns bytes that only another tenant uploaded;
- search hits, generation sources and citations name only the tenant's own live documents;
- another tenant's id answers exactly like an id that does not exist (404 ``not_found``), and the delete of
  another tenant's document removes nothing;
- after each delete, every tenant's document list equals its own live documents, exactly.
"""

from __future__ import annotations

import base64
import io
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mmrag.api.auth import hash_key

TOPICS = [
    "The Ford Mustang was introduced in April 1964 at the New York World's Fair.",
    "The Jaguar E-Type was launched at the Geneva Motor Show in March 1961.",
    "The Volkswagen Beetle was built from 1938 to 2003 in several countries.",
    "The Citroen DS used hydropneumatic suspension that kept the body level.",
    "The Mini was launched in 1959 by the British Motor Corporation.",
]
QUESTIONS = ["When was the Ford Mustang introduced?", "Where was the Jaguar E-Type launched?",
             "How long was the Volkswagen Beetle built?", "What suspension did the Citroen DS use?",
             "Who launched the Mini?"]
MISSING_ID = "0123456789abcdef0123456789abcdef"


def tenant_key(index: int) -> str:
    return f"mmrag_tenancy-key-{index:02d}-0123456789abcdefghijklmnopqrstu"


def tenant_keys(tenants: int) -> list[dict[str, str]]:
    """``api.keys`` for ``tenants`` tenants named t0, t1, ... (key i belongs to tenant ti)."""
    return [{"hash": hash_key(tenant_key(i)), "tenant": f"t{i}", "name": f"tenancy-{i}"} for i in range(tenants)]


@dataclass
class Doc:
    tenant: int
    name: str
    kind: str  # text | image
    data: bytes
    marker: str
    doc_id: str = ""
    chunk_ids: set[str] = field(default_factory=set)


@dataclass
class TenancyRun:
    steps: int = 0
    requests: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    leaks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    checked_lists: int = 0
    seconds: float = 0.0

    def figures(self) -> dict[str, Any]:
        return {"steps": self.steps, "requests": sum(self.requests.values()),
                "requests_by_kind": dict(sorted(self.requests.items())),
                "statuses": dict(sorted(self.statuses.items())), "document_lists_checked": self.checked_lists,
                "leaks": len(self.leaks), "leak_details": self.leaks[:20], "problems": self.problems[:20],
                "seconds": round(self.seconds, 1)}


def png_bytes(rng: random.Random) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    image = Image.new("RGB", (32, 32), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    image.putpixel((rng.randrange(32), rng.randrange(32)), (rng.randrange(256), 0, 0))
    image.save(out, format="PNG")
    return out.getvalue()


class Tenancy:
    """The schedule and its model of who owns what. ``client`` is any httpx-like client of the app (Starlette's
    TestClient in process, or ``httpx.Client(base_url=...)``)."""

    def __init__(self, client: Any, tenants: int, seed: int, *, generate: bool = True, max_files: int = 3) -> None:
        self.client = client
        self.tenants = tenants
        self.rng = random.Random(seed)
        self.with_generation = generate
        self.max_files = max_files
        self.run = TenancyRun()
        self.docs: dict[int, dict[str, Doc]] = {t: {} for t in range(tenants)}  # live, by doc id
        self.gone: dict[int, dict[str, Doc]] = {t: {} for t in range(tenants)}  # deleted
        self.counter = 0
        self.images_of: dict[int, set[bytes]] = {t: set() for t in range(tenants)}  # every image a tenant sent

    # -- helpers --------------------------------------------------------------------------------------------------
    def headers(self, tenant: int) -> dict[str, str]:
        return {"Authorization": f"Bearer {tenant_key(tenant)}"}

    def call(self, tenant: int, kind: str, method: str, path: str, **kwargs: Any) -> Any:
        response = self.client.request(method, path, headers=self.headers(tenant), **kwargs)
        self.run.requests[kind] += 1
        self.run.statuses[f"{kind} {response.status_code}"] += 1
        self.scan(tenant, kind, response)
        return response

    def others(self, tenant: int) -> list[int]:
        return [t for t in range(self.tenants) if t != tenant]

    def foreign_docs(self, tenant: int) -> list[Doc]:
        return [d for t in self.others(tenant) for d in (*self.docs[t].values(), *self.gone[t].values())]

    def scan(self, tenant: int, kind: str, response: Any) -> None:
        """Another tenant's marker, document id, chunk id or file name anywhere in the body is a leak."""
        content_type = response.headers.get("content-type", "")
        if content_type.startswith("image/"):
            data = response.content
            owners = [t for t, sent in self.images_of.items() if data in sent]
            if owners and tenant not in owners:
                self.run.leaks.append(f"{kind} for t{tenant} returned an image only t{owners} uploaded")
            return
        text = response.text
        for other in self.others(tenant):
            if f"TENANTMARK{other}Z" in text:
                self.run.leaks.append(f"{kind} for t{tenant} holds tenant t{other}'s marker")
        for doc in self.foreign_docs(tenant):
            for needle in (doc.marker, doc.doc_id, doc.name, *doc.chunk_ids):
                if needle and needle in text:
                    self.run.leaks.append(f"{kind} for t{tenant} holds {needle!r} of t{doc.tenant}")

    def problem(self, message: str) -> None:
        self.run.problems.append(f"step {self.run.steps}: {message}")

    def own_live_ids(self, tenant: int) -> set[str]:
        return set(self.docs[tenant])

    # -- the steps ------------------------------------------------------------------------------------------------
    def new_doc(self, tenant: int) -> Doc:
        self.counter += 1
        marker = f"DOC{self.counter:05d}T{tenant}Q{self.rng.randrange(16 ** 6):06x}"
        if self.rng.random() < 0.3:
            # Now and then the same bytes as another tenant's image: one shared blob, owned by both.
            foreign = [d for d in self.foreign_docs(tenant) if d.kind == "image"]
            data = self.rng.choice(foreign).data if foreign and self.rng.random() < 0.3 else png_bytes(self.rng)
            self.images_of[tenant].add(data)
            return Doc(tenant, f"{marker.lower()}.png", "image", data, marker)
        text = (f"# Notes {marker}\n\nTENANTMARK{tenant}Z {marker}. {self.rng.choice(TOPICS)} "
                f"{self.rng.choice(TOPICS)}\n")
        return Doc(tenant, f"{marker.lower()}.md", "text", text.encode(), marker)

    def upload(self, tenant: int) -> None:
        docs = [self.new_doc(tenant) for _ in range(self.rng.randint(1, self.max_files))]
        response = self.call(tenant, "upload", "POST", "/v1/documents",
                             files=[("files", (d.name, d.data, "application/octet-stream")) for d in docs])
        if response.status_code != 200:
            self.problem(f"upload answered {response.status_code}: {response.text[:300]}")
            return
        report = response.json()
        ids = {entry["name"]: entry["doc_id"] for entry in report["documents"]}
        for doc in docs:
            if doc.name not in ids:
                self.problem(f"upload of {doc.name} not ingested: {report['failed']}")
                continue
            doc.doc_id = ids[doc.name]
            self.docs[tenant][doc.doc_id] = doc

    def search(self, tenant: int) -> None:
        body: dict[str, Any] = {"k_text": 5, "k_image": 3}
        roll = self.rng.random()
        if roll < 0.6:
            body["text"] = self.rng.choice(QUESTIONS + TOPICS)
        elif roll < 0.8:
            images = [d.data for t in range(self.tenants) for d in self.docs[t].values() if d.kind == "image"]
            if not images:
                body["text"] = self.rng.choice(QUESTIONS)
            else:  # by image, often another tenant's own picture
                body["image"] = base64.b64encode(self.rng.choice(images)).decode()
        else:  # filters that name another tenant's documents
            foreign = [d for d in self.foreign_docs(tenant) if d.doc_id]
            target = self.rng.choice(foreign) if foreign else None
            body["text"] = self.rng.choice(QUESTIONS)
            body["filter"] = self.rng.choice([
                f'doc_id == "{target.doc_id}"' if target else 'modality == "text"',
                f'doc_id == "{target.doc_id}" or modality == "text"' if target else 'page >= -1',
                f'source like "*{target.name}"' if target else 'modality == "image"',
                'modality == "image" or modality == "text"',
            ])
        response = self.call(tenant, "search", "POST", "/v1/search", json=body)
        if response.status_code != 200:
            self.problem(f"search {body.get('filter')} answered {response.status_code}: {response.text[:300]}")
            return
        data = response.json()
        own = self.own_live_ids(tenant)
        for hit in data["text"] + data["images"]:
            if hit["doc_id"] not in own:
                self.problem(f"search for t{tenant} returned {hit['doc_id']}, not its live document")
            elif hit["doc_id"] in self.docs[tenant]:
                self.docs[tenant][hit["doc_id"]].chunk_ids.add(hit["id"])

    def generate(self, tenant: int) -> None:
        response = self.call(tenant, "generate", "POST", "/v1/generate",
                             json={"prompt": self.rng.choice(QUESTIONS), "max_new_tokens": 4, "k_text": 3})
        if response.status_code != 200:
            self.problem(f"generate answered {response.status_code}: {response.text[:300]}")
            return
        answer = response.json()
        own = {d.name: d for d in self.docs[tenant].values()}
        for entry in answer["citations"] + answer["sources"]:
            name = entry["source"].replace("\\", "/").rsplit("/", 1)[-1]
            if name not in own:
                self.problem(f"generation for t{tenant} cites or sources {entry['source']}, not its live document")
            else:
                own[name].chunk_ids.add(entry["chunk_id"])

    def list_documents(self, tenant: int) -> None:
        response = self.call(tenant, "list", "GET", "/v1/documents")
        listed = {d["doc_id"] for d in response.json()["documents"]}
        self.run.checked_lists += 1
        if listed != self.own_live_ids(tenant):
            self.problem(f"t{tenant} lists {len(listed)} documents, owns {len(self.own_live_ids(tenant))} live: "
                         f"extra {sorted(listed - self.own_live_ids(tenant))[:3]}, "
                         f"missing {sorted(self.own_live_ids(tenant) - listed)[:3]}")

    def get_document(self, tenant: int) -> None:
        own = list(self.docs[tenant].values())
        foreign = [d for d in self.foreign_docs(tenant) if d.doc_id]
        missing = self.call(tenant, "get", "GET", f"/v1/documents/{MISSING_ID}")
        if own and self.rng.random() < 0.5:
            doc = self.rng.choice(own)
            response = self.call(tenant, "get", "GET", f"/v1/documents/{doc.doc_id}")
            if response.status_code != 200 or response.json()["name"] != doc.name:
                self.problem(f"t{tenant} could not get its own {doc.name}: {response.status_code}")
        elif foreign:
            doc = self.rng.choice(foreign)
            response = self.call(tenant, "get", "GET", f"/v1/documents/{doc.doc_id}")
            if (response.status_code, response.json()) != (missing.status_code, missing.json()):
                self.problem(f"t{tenant} got t{doc.tenant}'s document: {response.status_code}")

    def fetch_image(self, tenant: int) -> None:
        own = [(d, c) for d in self.docs[tenant].values() if d.kind == "image" for c in d.chunk_ids]
        foreign = [(d, c) for d in self.foreign_docs(tenant) if d.kind == "image" for c in d.chunk_ids]
        if own and self.rng.random() < 0.5:
            doc, chunk = self.rng.choice(own)
            response = self.call(tenant, "image", "GET", f"/v1/images/{chunk}")
            if response.status_code != 200 or response.content != doc.data:
                self.problem(f"t{tenant} could not fetch its own image {doc.name}: {response.status_code}")
        elif foreign:
            doc, chunk = self.rng.choice(foreign)
            response = self.call(tenant, "image", "GET", f"/v1/images/{chunk}")
            if response.status_code != 404 or response.json()["code"] != "not_found":
                self.problem(f"t{tenant} fetched t{doc.tenant}'s image chunk: {response.status_code}")

    def delete(self, tenant: int) -> None:
        foreign = [d for t in self.others(tenant) for d in self.docs[t].values()]
        if foreign and self.rng.random() < 0.3:  # another tenant's live document: must stay
            doc = self.rng.choice(foreign)
            response = self.call(tenant, "delete", "DELETE", f"/v1/documents/{doc.doc_id}")
            if response.status_code != 404:
                self.problem(f"t{tenant} deleting t{doc.tenant}'s document answered {response.status_code}")
        elif self.docs[tenant]:
            doc = self.docs[tenant].pop(self.rng.choice(sorted(self.docs[tenant])))
            response = self.call(tenant, "delete", "DELETE", f"/v1/documents/{doc.doc_id}")
            if response.status_code != 200:
                self.problem(f"t{tenant} could not delete its {doc.name}: {response.status_code}")
            self.gone[tenant][doc.doc_id] = doc
        else:
            return
        for t in range(self.tenants):  # after each delete, every tenant sees exactly its own live documents
            self.list_documents(t)

    # -- the schedule ---------------------------------------------------------------------------------------------
    def step(self) -> None:
        tenant = self.rng.randrange(self.tenants)
        if not self.docs[tenant]:
            action = "upload"
        else:
            weights = {"upload": 3, "search": 4, "generate": 1 if self.with_generation else 0, "list": 1, "get": 1,
                       "image": 1, "delete": 1.5}
            action = self.rng.choices(list(weights), weights=list(weights.values()))[0]
        getattr(self, {"list": "list_documents", "get": "get_document", "image": "fetch_image"}.get(
            action, action))(tenant)
        self.run.steps += 1

    def play(self, steps: int) -> TenancyRun:
        started = time.monotonic()
        for _ in range(steps):
            self.step()
        for tenant in range(self.tenants):
            self.list_documents(tenant)
        self.run.seconds = time.monotonic() - started
        return self.run
