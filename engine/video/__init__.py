"""Video and live streams: sources through PyAV (:mod:`.source`), the overlapped decode /
segment / encode pipeline (:mod:`.pipeline`) and what it writes (:mod:`.outputs`). Needs the
``[video]`` extra (PyAV, pycocotools), imported only when a video is opened."""
