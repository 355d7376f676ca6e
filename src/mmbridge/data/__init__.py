"""Data: the ShapesWorld world (``mmbridge.data.shapes``) and the ecosystem formats
(``mmbridge.data.formats``).  Needs numpy + Pillow (+ pycocotools/scipy), never torch."""
