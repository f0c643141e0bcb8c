"""The client room: :class:`FaceClient` (embed, verify, many images per job, gallery calls, results without
polling), its per-job options and image inputs. Errors it raises are :mod:`producer.contract.errors`."""

from producer.client.face_client import FaceClient
from producer.client.images import ImageInput
from producer.client.options import JobOptions

__all__ = ["FaceClient", "ImageInput", "JobOptions"]
