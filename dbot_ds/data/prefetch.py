"""Batches ready on the device, prepared while the current step runs.

Each batch from the DataLoader becomes normalised images [B, 3, H, W] in the compute dtype on
the device, one batch ahead, on a thread of its own (the decode and the resize release the
interpreter) and, on CUDA, a stream of its own: uint8 crops are copied from pinned memory and
normalised; JPEG batches (data.decode=device) are decoded, cropped, resized and normalised;
(images, labels) of fine-tuning, normalised by their transform already, are copied. The training
stream waits for a batch's event before using it: no host synchronisation. With ahead=0 batches
are prepared in the caller's thread, when asked for (for transforms that draw from the global
random generators in this process: another thread would race the training step's draws).
"""

from __future__ import annotations

import contextlib
import queue
import threading

import torch

from dbot_ds.data.device_decode import JpegBatch, decode_batch
from dbot_ds.data.transforms import normalize_on_device

_DONE = object()


class DevicePrefetcher:
    def __init__(self, loader, device: torch.device, dtype: torch.dtype, size: int, ahead: int = 2):
        self.loader, self.device, self.dtype, self.size, self.ahead = loader, device, dtype, size, ahead

    def __len__(self) -> int:
        return len(self.loader)

    def prepare(self, batch):
        if isinstance(batch, JpegBatch):
            return decode_batch(batch, self.size, self.device, self.dtype)
        if isinstance(batch, (tuple, list)):
            imgs, labels = batch
            return (imgs.to(self.device, non_blocking=True).to(self.dtype),
                    labels.to(self.device, non_blocking=True))
        return normalize_on_device(batch, self.device, self.dtype)

    def __iter__(self):
        if self.ahead == 0:
            yield from map(self.prepare, self.loader)
            return
        ready: queue.Queue = queue.Queue(maxsize=self.ahead)
        stop = threading.Event()
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None

        def produce():
            try:
                with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                    for batch in self.loader:
                        imgs = self.prepare(batch)
                        event = torch.cuda.Event() if cuda else None
                        if cuda:
                            event.record(stream)
                        while not stop.is_set():
                            try:
                                ready.put((imgs, event), timeout=0.1)
                                break
                            except queue.Full:
                                continue
                        if stop.is_set():
                            return
                ready.put((_DONE, None))
            except BaseException as e:  # the consumer re-raises it as it was
                ready.put((e, None))

        worker = threading.Thread(target=produce, name="dbot-prefetch", daemon=True)
        worker.start()
        try:
            while True:
                imgs, event = ready.get()
                if imgs is _DONE:
                    return
                if isinstance(imgs, BaseException):
                    raise imgs
                if cuda:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)     # on the device: the host does not wait
                    for t in imgs if isinstance(imgs, tuple) else (imgs,):
                        t.record_stream(current)  # made on the side stream, used on this one
                yield imgs
        finally:
            stop.set()
            while worker.is_alive():  # let a producer blocked on a full queue see the stop
                try:
                    ready.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.05)

