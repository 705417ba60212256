"""OpenVid-1M data pipeline: PyAV decoding and Open-Sora 1.0's clip transforms (``video``), the release CSV
over a folder of clips (``csv_dataset``), WebDataset tar shards (``webdataset``), and a resumable
distributed DataLoader (``loader``), a latent cache of VAE latents and T5 features (``latent_cache``), and a
generated sample set of coloured shapes in motion for tiny end-to-end runs (``sample_set``)."""

from openvid_models.data.csv_dataset import (OPENVID_COLUMNS, ClipFilter, ClipRecord, OpenVidDataset,
                                             read_openvid_csv, summarize_skipped)
from openvid_models.data.latent_cache import CacheSummary, LatentCacheDataset, build_latent_cache, read_manifest
from openvid_models.data.loader import ResumableDataLoader, ResumableDistributedSampler, build_dataloader
from openvid_models.data.sample_set import (COLOURS, DIRECTIONS, SHAPES, ClipDescription, all_captions, caption_for,
                                            describe_clip, parse_caption, write_sample_set)
from openvid_models.data.video import (SKIP_REASONS, ClipError, VideoInfo, frames_to_model_input,
                                       load_training_clip, normalize_to_unit_range, probe_video, read_clip,
                                       read_frames, resize_center_crop, sample_frame_indices)
from openvid_models.data.webdataset import OpenVidWebDataset

__all__ = ["COLOURS", "DIRECTIONS", "OPENVID_COLUMNS", "SHAPES", "SKIP_REASONS", "CacheSummary", "ClipDescription",
           "ClipError", "ClipFilter", "ClipRecord", "LatentCacheDataset", "OpenVidDataset", "OpenVidWebDataset",
           "ResumableDataLoader", "ResumableDistributedSampler", "VideoInfo", "all_captions", "build_dataloader",
           "build_latent_cache", "caption_for", "describe_clip", "frames_to_model_input", "load_training_clip",
           "normalize_to_unit_range", "parse_caption", "probe_video", "read_clip", "read_frames", "read_manifest",
           "read_openvid_csv", "resize_center_crop", "sample_frame_indices", "summarize_skipped", "write_sample_set"]
