#pragma once

// Symbols of the operator library that C++ users call directly.
#if defined(_WIN32)
#if defined(CNN_ATTENTION_BUILD_LIBRARY)
#define CNN_ATTENTION_API __declspec(dllexport)
#else
#define CNN_ATTENTION_API __declspec(dllimport)
#endif
#else
#define CNN_ATTENTION_API __attribute__((visibility("default")))
#endif
