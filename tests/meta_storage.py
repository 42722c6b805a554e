"""A ``torch.distributed.checkpoint`` storage for tensors without data (the ``meta`` device).

DCP's file system writer copies every tensor to the CPU, which ``meta`` tensors cannot do. This
storage keeps DCP's whole planning (flattening, metadata, strict key matching, in-place loads
through the planner) and replaces only the byte IO: it records each saved tensor's device and
metadata and, on load, commits the destination tensors unchanged. Checkpoints are kept in memory
under an id written into the checkpoint folder, so renaming the folder keeps them reachable.
"""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import default_planner
from torch.distributed.checkpoint.planner import LoadItemType, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

MARKER = "meta-checkpoint-id"


class MetaStore:
    """Saved checkpoints (metadata, bytes items) and the devices of every tensor written/read."""

    def __init__(self):
        self.checkpoints: dict[str, dict] = {}
        self.written: dict[str, str] = {}  # key -> device type of the saved tensor
        self.loaded: dict[str, str] = {}  # key -> device type of the destination

    def install(self, monkeypatch, module) -> None:
        """Route ``module._dcp()`` (``components.checkpoint``) through this storage."""
        real_save, real_load = dcp.save, dcp.load
        store = self

        class _DCP:
            FileSystemReader = staticmethod(lambda path: _Reader(store, path))

            @staticmethod
            def save(state, checkpoint_id, **kw):
                return real_save(state, storage_writer=_Writer(store, checkpoint_id), **kw)

            @staticmethod
            def load(state, checkpoint_id, **kw):
                return real_load(state, storage_reader=_Reader(store, checkpoint_id), **kw)
        monkeypatch.setattr(module, "_dcp", lambda: _DCP)
        # DCP materialises meta destinations on the process group's device before loading;
        # here the meta tensors are the run's own and must be loaded into as they are
        monkeypatch.setattr(default_planner, "_init_state_dict", lambda state_dict: None)


class _Writer(StorageWriter):
    def __init__(self, store: MetaStore, path):
        self.store, self.path, self.bytes = store, Path(path), {}

    def reset(self, checkpoint_id=None) -> None:
        pass

    def set_up_storage_writer(self, is_coordinator: bool, *args, **kwargs) -> None:
        pass

    def prepare_local_plan(self, plan):
        return plan

    def prepare_global_plan(self, plans):
        return plans

    def write_data(self, plan, planner):
        results = []
        for item in plan.items:
            data = planner.resolve_data(item)
            key = item.index.fqn
            if item.type == WriteItemType.BYTE_IO:
                self.bytes[key] = data.getvalue()
            else:
                self.store.written[key] = data.device.type
            results.append(WriteResult(index=item.index, size_in_bytes=0, storage_data=None))
        done: Future = Future()
        done.set_result(results)
        return done

    def finish(self, metadata, results) -> None:
        ident = uuid.uuid4().hex
        self.store.checkpoints[ident] = {"metadata": metadata, "bytes": self.bytes}
        (self.path / MARKER).write_text(ident)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True

    def storage_meta(self):
        return None


class _Reader(StorageReader):
    def __init__(self, store: MetaStore, path):
        self.store, self.path = store, Path(path)

    def _saved(self) -> dict:
        return self.store.checkpoints[(self.path / MARKER).read_text()]

    def reset(self, checkpoint_id=None) -> None:
        pass

    def read_metadata(self):
        return self._saved()["metadata"]

    def set_up_storage_reader(self, metadata, is_coordinator: bool, *args, **kwargs) -> None:
        pass

    def prepare_local_plan(self, plan):
        return plan

    def prepare_global_plan(self, plans):
        return plans

    def read_data(self, plan, planner):
        saved = self._saved()["bytes"]
        for item in plan.items:
            key = item.dest_index.fqn
            if item.type == LoadItemType.BYTE_IO:
                planner.load_bytes(item, io.BytesIO(saved[key]))
                continue
            target = planner.resolve_tensor(item)
            self.store.loaded[key] = target.device.type
            planner.commit_tensor(item, target)
        done: Future = Future()
        done.set_result(None)
        return done

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True
