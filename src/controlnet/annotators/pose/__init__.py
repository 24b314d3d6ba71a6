"""Poses: OpenPose keypoints, their JSON, and drawing them as the ControlNet pose models were trained."""
