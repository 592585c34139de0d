"""Stage ``embed``: a face-recognition embedding per primary face (``base``, ``dlib_resnet``, ``stage``)."""
