"""68 iBUG landmarks on the primary MTCNN face: backends (FAN, dlib) and the ``landmarks`` stage."""
