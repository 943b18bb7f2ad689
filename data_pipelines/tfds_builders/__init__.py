"""TFDS builders: the prepared form of the dataset sources, written as array_record.

`faces` turns any dataset source of `data_pipelines.sources` into a TFDS dataset of its faces
(decoded, cropped and aligned once, stored losslessly with their labels); `prepare` is the
`fbnet prepare` command around it; `data_pipelines.sources.prepared` reads the result back
without TensorFlow.
"""
