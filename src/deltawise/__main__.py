from deltawise.launch import main

main()
