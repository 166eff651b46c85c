# Sources of the infer area (appended to FASTML_CORE_SOURCES).
list(APPEND FASTML_CORE_SOURCES
  "${CMAKE_CURRENT_LIST_DIR}/batcher.cpp"
  "${CMAKE_CURRENT_LIST_DIR}/forest.cpp"
  "${CMAKE_CURRENT_LIST_DIR}/forest_emulate.cpp"
  "${CMAKE_CURRENT_LIST_DIR}/forest_no_cuda.cpp"
)
