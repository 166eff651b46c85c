# Sources of the drift area (appended to FASTML_CORE_SOURCES).
list(APPEND FASTML_CORE_SOURCES
)
