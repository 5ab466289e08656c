"""Raw counts -> corpus folders: vocabularies (``vocab``), count-file readers (``readers``), the rank value
encoding (``encode``), the distributed tokenize job (``tokenize``), corpus folders and their readers
(``corpus``), and Geneformer dataset conversion (``convert``). Imports only the shared top-level modules."""
