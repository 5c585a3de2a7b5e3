/* version — the product version, one place. */
#ifndef AMP_VERSION_H
#define AMP_VERSION_H

#define AMP_VERSION "0.1.0"

#endif
