//! HTTP/1.1 as the fast path reads and writes it: request heads it forwards or hands to
//! hyper ([`request`]), upstream answers it relays or refuses ([`response`]), and chunked
//! bodies followed byte by byte ([`chunked`]). No IO: public so that the fuzzer and the
//! differential test against hyper drive exactly this code.

pub mod chunked;
pub mod request;
pub mod response;
