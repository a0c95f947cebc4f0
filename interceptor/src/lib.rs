//! interceptor
